"""Distiller's meta layer: the pipeline vocabulary, HPO, AutoDistiller, the evidence tools."""
