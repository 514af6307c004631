"""tuneloop: adapt a small open language model to your task, and prove it was worth it.

The public Python API (the CLI is a thin shell over these):

    from tuneloop import load_recipe, train, evaluate, validate
    result = train(load_recipe("examples/banking77/recipe.yaml"))
    evaluate(result["run_id"], "examples/banking77/test.jsonl")
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import tuneloop` stays fast; torch loads only when a function needs it.
    if name == "train":
        from tuneloop.train.run import train
        return train
    if name == "evaluate":
        from tuneloop.evaluate import evaluate
        return evaluate
    if name == "validate":
        from tuneloop.data.validate import validate
        return validate
    if name in ("load_recipe", "Recipe"):
        from tuneloop import project
        return getattr(project, name)
    if name == "TuneloopError":
        from tuneloop.errors import TuneloopError
        return TuneloopError
    raise AttributeError(name)


__all__ = ["train", "evaluate", "validate", "load_recipe", "Recipe", "TuneloopError"]
