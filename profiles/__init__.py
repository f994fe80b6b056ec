"""Deployment profiles shipped with latentlink (YAML files beside this one) and the default model's files
(``default/``). Load them with ``latentlink.edge.profile.load_profile("nano-504")``."""
