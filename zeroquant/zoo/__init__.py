"""The model zoo (models.yaml) and loading of user model files."""
