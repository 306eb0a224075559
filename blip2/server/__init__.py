"""`blip2 serve`: an HTTP service over one model, with request batching and a web page.

`app.create_app(engine, settings)` builds the FastAPI app; `engine.Engine` owns the model;
`batcher.Batcher` groups requests into forward passes; `limits` holds settings and checks.
Nothing here is imported by the rest of the package, so FastAPI stays an optional extra.
"""
