"""OpenAI-compatible completion server: the HTTP app (app.py), the continuous-batching engine
(engine.py), and request parsing and response shapes (protocol.py)."""
