"""lowbit.service: the HTTP model service (MISSION K.25-26, H.22).

- ``store.py``: model folders with ``metadata.json`` (what ``lowbit.save`` writes), checked, swept;
- ``active.py``: the serving model and the hot swap (load fully, then switch);
- ``embed.py``: sentence embeddings from a served encoder;
- ``jobs.py`` + ``quantize_job.py``: background quantization with progress;
- ``online_calibration.py``: traffic buffer, per-scheme recalibrators, validate-then-swap;
- ``limits.py``: API key, body size, batch/length limits, overload admission;
- ``metrics.py``: Prometheus text;
- ``state.py``: all of the above as one :class:`ModelService`; ``app.py``: FastAPI routes over it;
- ``server.py``: uvicorn runners. ``lowbit serve --store DIR`` is the command line.
"""

from __future__ import annotations


def create_service_app(store_dir, api_key: str, **kwargs):
    """A ready FastAPI app over the store at ``store_dir`` (see :class:`~lowbit.service.state.ModelService`)."""
    from lowbit.service.app import create_app
    from lowbit.service.state import ModelService

    return create_app(ModelService(store_dir, api_key, **kwargs))
