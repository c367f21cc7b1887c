"""Team setup on one machine: a DVC remote on S3 (moto server) and MLflow on PostgreSQL
(Debian's postgresql, a throwaway cluster) with its artifacts in the same S3.

A retraining run of stand-in stages logs its runs to PostgreSQL, its artifacts and registered
model to the bucket, and pushes the DVC outs; a fresh clone then restores the models with
`dvc pull`. PostgreSQL missing is a failure with the install command, never a skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmpipe.core.files import md5_file
from tests.helpers import servers as T

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="session")
def prefect_api(request):
    T.shared_prefect_harness(120)
    request.addfinalizer(T.close_shared_prefect_harness)


@pytest.fixture(scope="module")
def s3():
    with T.moto_s3("lmpipe") as server:
        yield server


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    with T.postgres_cluster(tmp_path_factory.mktemp("pg")) as url:
        yield url


def test_retrain_on_postgres_and_s3_then_pull_into_a_fresh_clone(
        prefect_api, s3, postgres, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.remote import configure_dvc_remote
    from pipeline.retrain import lmpipe_retrain

    graph = {"download": [], "pretrain": ["download"]}
    root = T.make_fake_project(tmp_path / "proj", graph)
    env = {**s3["env"], "MLFLOW_TRACKING_URI": postgres,
           "LMPIPE_ARTIFACT_URI": "s3://lmpipe/mlflow", "MLFLOW_S3_ENDPOINT_URL": s3["endpoint"],
           "LMPIPE_DVC_REMOTE": "s3://lmpipe/dvc", "LMPIPE_S3_ENDPOINT_URL": s3["endpoint"],
           "LMPIPE_TRACKING": "on", "LMPIPE_ROOT": str(root)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("LMPIPE_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(root)

    report = lmpipe_retrain(root=str(root))

    # MLflow: runs in PostgreSQL, artifacts and the registered model in the bucket.
    client = MlflowClient(postgres)
    parent = client.get_run(report["pipeline"]["parent_run_id"])
    assert parent.info.artifact_uri.startswith("s3://lmpipe/mlflow/")
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {c.data.tags["dvc_stage"] for c in children} == set(graph)
    keys = T.s3_keys(s3["client"], "lmpipe", "mlflow/")
    assert any(k.endswith(f"{parent.info.run_id}/artifacts/dvc.lock") for k in keys), keys
    assert any(k.endswith("models/transformer/model.safetensors") for k in keys)
    champ = client.get_model_version_by_alias("lmpipe-transformer", "champion")
    assert champ.source.startswith("s3://lmpipe/mlflow/")
    # ...and the store really is PostgreSQL: the same rows, read with psycopg2 directly.
    import psycopg2
    from sqlalchemy.engine import make_url

    url = make_url(postgres)
    with psycopg2.connect(host=url.host, port=url.port, user=url.username,
                          password=url.password, dbname=url.database) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (parent.info.run_id,))
            assert cur.fetchall() == [("FINISHED",)]
            cur.execute("SELECT version, source FROM model_versions WHERE name = %s",
                        ("lmpipe-transformer",))
            assert cur.fetchall() == [(int(champ.version), champ.source)]

    # DVC: pushed to the bucket; a fresh clone pulls the same bytes back.
    assert "dvc push to lmpipe" in report["push"]
    assert T.s3_keys(s3["client"], "lmpipe", "dvc/")
    T.sh(["git", "add", "dvc.lock", "metrics"], root)  # uncached outs live in git
    T.sh(["git", "commit", "-q", "-m", "lock"], root)
    clone = tmp_path / "clone"
    T.sh(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    configure_dvc_remote(clone, "s3://lmpipe/dvc")
    T.sh([str(T.BIN / "dvc"), "pull", "-q"], clone, T.test_env(**env))
    model = Path("data/models/transformer/model.safetensors")
    assert md5_file(clone / model) == md5_file(root / model)
    status = T.sh([str(T.BIN / "dvc"), "status", "--json"], clone, T.test_env(**env)).stdout
    assert status.strip() in ("{}", "")
