"""The default proxy length predictor artifact (see services.predictor.train)."""
