"""pykd's tests, grouped by layer: ops (kernels and the fused ops), capture, kd (the KD engine), distiller
(HPO and AutoDistiller), nas (architecture search), package (CLI, install, layout). Shared helpers live
here and are imported as `tests.<module>` (the repository root is on sys.path under pytest)."""
