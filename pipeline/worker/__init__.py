"""The attribution worker: Faust agents joining postbacks to clicks."""
