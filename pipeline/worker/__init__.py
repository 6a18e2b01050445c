"""The attribution worker: Faust batch handlers joining postbacks to clicks."""
