"""Operating a run: metric names grouped by subsystem (:mod:`.names`), plots (:mod:`.plot`) and a
summary (:mod:`.analyze`) read back from a run folder. Pure Python (the Ray exporter is
:mod:`jobs.ray_metrics`)."""
