"""Architecture search: spaces, SuperLM, Mixture-of-Supernets, sandwich training, search, CLI."""
