"""Where a search's Optuna study lives: storages from URLs (the journal file, SQLite in WAL mode, any
RDB), opening or resuming a study (checking it searches the same thing), and naming its objectives.

A study holds, beside Optuna's own records: `mpsearch` (the search's identity: task, target,
space, objectives, budgets; a resume must match it), LAUNCH_ATTR (the SearchOptions a worker joins
with) and, per trial, its record (mpsearch.engine.loop.record_attrs) and owner.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import sqlite3
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from mpsearch.cache import append_bytes
from mpsearch.defaults import STUDY_FILE
from mpsearch.engine.loop import has_record, record_of
from mpsearch.errors import InvalidConfigError
from mpsearch.results.objectives import OBJECTIVES
from search_spaces import SearchSpace

LAUNCH_ATTR = "mpsearch.launch"  # a study's search options, for the workers that join it
HEARTBEAT_S = 5  # shared RDB storages: a running trial's heartbeat interval
HEARTBEAT_GRACE_S = 20  # and how long without one before the trial counts as dead



def metric_names(objectives: Sequence[str], metric_name: str) -> list[str]:
    """The study's objective names, as a dashboard shows them: the task's metric name, then each
    cost under its result.json name (latency_ms, weight_bytes, ...)."""
    return [metric_name if o == "metric" else OBJECTIVES[o].attr for o in objectives]



def open_study(storage_url: str, study_name: str | None, resume: bool, sampler, identity: dict,
               objectives: Sequence[str], metric_name: str, space: SearchSpace, default_name: str,
               retries: int | None = None, launch: dict | None = None):
    """(study, name, previous TrialRecords, storage): a new study, or on resume the stored one
    after checking it searches the same task, target, space and objectives. The study's objectives
    are named (metric_names). retries: the storage is shared by several processes (see
    make_storage); launch: what `mpsearch worker` needs to join a new study (stored as the
    LAUNCH_ATTR user attribute)."""
    directions = [OBJECTIVES[o].direction for o in objectives]
    names = metric_names(objectives, metric_name)
    try:
        if resume:
            for prefix in ("sqlite:///", "journal:///"):
                if storage_url.startswith(prefix) and not Path(storage_url.removeprefix(prefix)).exists():
                    raise InvalidConfigError(f"nothing to resume: {storage_url.removeprefix(prefix)} does not exist")
        store = make_storage(storage_url, retries)
        if resume:
            study_name = pick_study(store, study_name, "nothing to resume: the storage holds no study")
            study = optuna.load_study(study_name=study_name, storage=store, sampler=sampler)
            stored = study.user_attrs.get("mpsearch")
            if stored is None and not study.get_trials(deepcopy=False):
                # its search was killed between creating it and recording what it searches: start it over
                _name_objectives(study, names)
                study.set_user_attr("mpsearch", identity)
                if launch is not None:
                    study.set_user_attr(LAUNCH_ATTR, launch)
                return study, study_name, [], store
            stored = stored or {}
            differs = [f"{k}: stored {stored.get(k)!r}, this run {v!r}" for k, v in identity.items()
                       if stored.get(k) != v]
            if differs:
                raise InvalidConfigError(f"cannot resume study {study_name!r}, it differs in " + "; ".join(differs))
            previous = [record_of(t, space) for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
                        if has_record(t) and t.state in (TrialState.COMPLETE, TrialState.FAIL)]
            if study.metric_names is None:  # a study made before its objectives were named
                _name_objectives(study, names)
            return study, study_name, previous, store
        if study_name is None:
            study_name = f"{default_name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        try:
            study = optuna.create_study(study_name=study_name, storage=store, sampler=sampler,
                                        directions=directions)
        except optuna.exceptions.DuplicatedStudyError:
            raise InvalidConfigError(f"a study named {study_name!r} already exists in the storage: "
                                     "continue it with --resume or pick another --study-name") from None
        _name_objectives(study, names)
        if launch is not None:
            study.set_user_attr(LAUNCH_ATTR, launch)
        study.set_user_attr("mpsearch", identity)  # last: a study with it is complete (see resume above)
        return study, study_name, [], store
    except (ImportError, ValueError, sqlalchemy_errors()) as e:
        raise InvalidConfigError(f"cannot open the study storage {redact(storage_url)}: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None



def _name_objectives(study: optuna.Study, names: list[str]) -> None:
    with warnings.catch_warnings():  # "experimental" since Optuna 3.2
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(names)



def default_storage(out: Path) -> str:
    """A search's own study: Optuna's journal file OUT/study.log (asking and telling cost about a
    quarter of what SQLite costs per trial: ~15 ms against ~55 ms on digits here), or the SQLite
    OUT/study.db of a search made before it became the default."""
    old = out / "study.db"
    return f"sqlite:///{old.resolve()}" if old.exists() else f"journal:///{(out / STUDY_FILE).resolve()}"



def pick_study(store, study_name: str | None, when_empty: str) -> str:
    """`study_name` if the storage holds it, else the only study it holds; InvalidConfigError
    naming what it does hold otherwise (`when_empty` when it holds none)."""
    names = optuna.study.get_all_study_names(store)
    if study_name is None:
        if len(names) != 1:
            raise InvalidConfigError(when_empty if not names else f"the storage holds {len(names)} studies; pick one "
                                     f"with --study-name: {', '.join(names)}")
        return names[0]
    if study_name not in names:
        raise InvalidConfigError(f"no study named {study_name!r} in the storage"
                                 + (f" (it has: {', '.join(names)})" if names else ""))
    return study_name



def make_storage(url: str, retries: int | None = None):
    """An Optuna storage from a URL: sqlite:///PATH (WAL mode, see sqlite_storage), any other
    SQLAlchemy URL, or journal:///PATH for Optuna's journal file (no database server; safe for
    several processes on one file system).

    retries not None: the storage is shared by several processes. RDB storages then keep a
    heartbeat of every running trial (HEARTBEAT_S); a trial whose process stopped beating for
    HEARTBEAT_GRACE_S is failed and enqueued again, up to `retries` times. Journal storages keep
    no heartbeats: a trial whose process died stays "running" there."""
    if url.startswith("journal:///"):
        return optuna.storages.JournalStorage(_journal_file(url.removeprefix("journal:///")))
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        heartbeat = {}
        if retries is not None:
            heartbeat = {"heartbeat_interval": HEARTBEAT_S, "grace_period": HEARTBEAT_GRACE_S,
                         "heartbeat_stale_trial_callback":
                         RetryHeartbeatStaleTrialCallback(max_retry=retries) if retries else None}
        if url.startswith("sqlite:///"):
            return _created(lambda: sqlite_storage(Path(url.removeprefix("sqlite:///")), **heartbeat))
        return _created(lambda: optuna.storages.RDBStorage(url, **heartbeat)) if heartbeat else url



def _created(make, attempts: int = 5):
    """make(): an RDB storage. Two processes opening a new database at once both create its
    tables and version row; the later one's create or insert fails ("table ... already exists",
    a UNIQUE constraint). It tries again: the database is complete by then."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    for i in range(attempts - 1):
        try:
            return make()
        except (IntegrityError, OperationalError):
            time.sleep(0.05 * (i + 1))
    return make()



def _journal_file(path: str):
    """Optuna's journal file backend without an fsync per append.

    Asking and telling a trial appends ~20 log lines here (one per parameter), each fsynced by
    Optuna: ~7 ms a digits trial. Without it a killed process still loses nothing it appended
    (the data is in the kernel's page cache; the file lock and the close() that publishes it to an
    NFS server stay), only a power cut could lose the last lines, as with SQLite's
    synchronous=NORMAL in sqlite_storage. The lock is Optuna's own (JournalFileSymlinkLock, its
    default), held through its public acquire / release.
    """
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    class Backend(JournalFileBackend):
        def __init__(self, file_path: str) -> None:
            self.path, self.lock = file_path, JournalFileSymlinkLock(file_path)
            super().__init__(file_path, lock_obj=self.lock)

        def append_logs(self, logs) -> None:
            self.lock.acquire()
            try:
                append_bytes(self.path, ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode())
            finally:
                self.lock.release()

    return Backend(path)



def sqlalchemy_errors() -> type[Exception]:
    try:
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:  # pragma: no cover - optuna's RDB storage depends on sqlalchemy
        return OSError
    return SQLAlchemyError



def redact(url: str) -> str:
    """A storage URL without its password."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)



def sqlite_storage(path: Path, **kwargs) -> optuna.storages.RDBStorage:
    """An Optuna SQLite storage in write-ahead-log mode with synchronous=NORMAL.

    Each commit then costs no fsync (about 5x faster per trial here), yet a killed process
    loses nothing that was committed: only a power cut could lose the last transactions.
    """

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return optuna.storages.RDBStorage(f"sqlite:///{path}", engine_kwargs={"creator": connect}, **kwargs)
