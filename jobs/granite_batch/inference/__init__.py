"""The Arrow stage around the models: routing, transcribing segments, assembling rows, language ID."""
