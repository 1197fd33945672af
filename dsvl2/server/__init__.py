"""``dsvl2 serve``: an OpenAI-compatible HTTP server over one loaded model (install extra ``server``).

* ``app``: ``create_app(model, ...)`` -> FastAPI app; the request flow and endpoints
* ``schema``: the chat request, checked field by field (OpenAI names, dsvl2 extensions)
* ``images``: where ``image_url`` images may come from (data URLs; files and fetches by flag)
* ``fetch``: fetching an image URL safely (public addresses only, the address checked is
  the one connected to, one deadline, redirects checked)
* ``guard``: the Host allow-list (DNS rebinding) and the Origin check (CSRF) of every request
* ``submit``: processing off the event loop, context fitting, ``n`` choices
* ``responses``: completion / chunk objects, the ``grounding`` and ``dropped_turns``
  extensions, the completion of finished choices (shared with ``dsvl2 batch``)
* ``metrics``: the Prometheus text exposition
* ``errors``: OpenAI's error shape and the status of each cause
* ``memory``: giving freed memory back to the OS while requests run
* ``ray_serve``: replicas on Ray Serve

The ``dsvl2 serve`` command line is ``dsvl2/commands/serve.py``.

Importing this package imports neither FastAPI nor torch; ``create_app`` is loaded on first use.
"""

__all__ = ["create_app"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
