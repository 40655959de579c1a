import pytest



@pytest.mark.ray
def test_unsatisfiable_placement_waits_logs_missing_and_times_out(local_ray, tmp_path, model_cache, caplog):
    """Asks for GPUs the local cluster lacks: a warning (not an error) at start, the missing
    resources logged while waiting, then a clear error after cluster.pg_timeout_s."""
    import logging
    import time

    from ray.util import placement_group_table

    from jobs.train import run
    from miles_ray.config import load_config
    from miles_ray.errors import UserError

    cfg = load_config(None, [f"output_dir={tmp_path}", f"model.tiny_cache_dir={model_cache}", "run_name=pgwait",
                             "cluster.use_gpu=true", "cluster.pg_timeout_s=3", "logging.wandb=false"])
    t0 = time.time()
    with caplog.at_level(logging.WARNING, "miles_ray.placement"), pytest.raises(UserError) as err:
        run(cfg)
    assert 3 <= time.time() - t0 < 60
    msg = str(err.value)
    assert "'pgwait-trainer'" in msg and "GPU: needs 2, cluster has 0" in msg and "pg_timeout_s=3" in msg
    assert "cannot hold this placement plan yet (GPU: needs 2, cluster has 0)" in caplog.text  # warned only
    assert "placement groups 'pgwait-trainer' (1 bundles PACK), 'pgwait-rollout' (1 bundles SPREAD) wait for" in caplog.text
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values() if pg["name"].startswith("pgwait"))
