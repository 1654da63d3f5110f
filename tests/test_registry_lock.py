"""The promotion lock on a store's unique registered-model names (here: a local SQLite store)."""

from __future__ import annotations

import os
import socket

import pytest
from mlflow.tracking import MlflowClient

from psyface import tracking
from psyface.errors import PsyfaceError


@pytest.fixture
def store(tmp_path, monkeypatch) -> MlflowClient:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.use_tracking(uri)
    return MlflowClient(uri, uri)


# creating a fresh SQLite store (MLflow's migrations) takes seconds
@pytest.mark.slow
def test_lock_excludes_a_second_holder_is_released_and_broken_when_its_owner_died(store, capsys):
    with tracking.registry_lock("m"):
        held = store.get_registered_model(f"m{tracking.LOCK_SUFFIX}")
        assert held.tags[tracking.LOCK_OWNER_TAG].endswith(f":{os.getpid()}")
        with pytest.raises(PsyfaceError, match="promotion lock of 'm'"):
            with tracking.registry_lock("m", wait_s=0.5):
                pass
    assert not store.search_registered_models(filter_string=f"name = 'm{tracking.LOCK_SUFFIX}'")
    with tracking.registry_lock("m"):  # free again
        pass
    store.create_registered_model(f"m{tracking.LOCK_SUFFIX}", tags={tracking.LOCK_OWNER_TAG: f"{socket.gethostname()}:999999999"})
    with tracking.registry_lock("m", wait_s=5):
        pass
    assert "broke the stale promotion lock" in capsys.readouterr().out


@pytest.mark.slow
def test_a_lock_released_while_the_store_reports_the_clash_is_taken_not_an_error(store, monkeypatch):
    """MLflow's create_registered_model meets the existing name (IntegrityError), then looks the model
    up to word its error; a holder that releases in between makes that lookup fail with
    RESOURCE_DOES_NOT_EXIST (seen with two evaluates against the PostgreSQL-backed server). The real
    store, with the holder's release placed exactly in that window: the waiter must get the lock."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    lock = f"m{tracking.LOCK_SUFFIX}"
    store.create_registered_model(lock, tags={tracking.LOCK_OWNER_TAG: f"elsewhere:{os.getpid()}"})
    lookup = SqlAlchemyStore.get_registered_model
    released = []

    def holder_releases_first(self, name):
        if name == lock and not released:
            released.append(name)
            self.delete_registered_model(name)
        return lookup(self, name)

    monkeypatch.setattr(SqlAlchemyStore, "get_registered_model", holder_releases_first)
    with tracking.registry_lock("m", wait_s=5):
        assert released and store.get_registered_model(lock).tags[tracking.LOCK_OWNER_TAG].endswith(f":{os.getpid()}")
    assert not store.search_registered_models(filter_string=f"name = '{lock}'")
