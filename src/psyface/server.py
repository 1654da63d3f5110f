"""`psyface server`: the team's MLflow tracking server on PostgreSQL, with users, on this machine.

    psyface server init DIR                 # PostgreSQL cluster + config in DIR (once)
    psyface server start DIR [--host H] [--port P]
    psyface server status DIR | stop DIR
    psyface server user add NAME --role read|edit|manage --dir DIR
    psyface server import mlruns/ --dir DIR # move a local SQLite store onto the server

What runs: PostgreSQL (a cluster in `DIR/postgres`, run as an unprivileged user because `initdb` and
`pg_ctl` refuse root, on 127.0.0.1 only, TCP only, a free port, password authentication) holds runs,
the registry and the users; `mlflow server` on it serves the tracking API and the UI with MLflow's
`basic-auth` app and *proxies* artifacts (`--artifacts-destination`: `DIR/artifacts` or any `s3://`,
`gs://` URI), so clients need only the URL and a user, never the database or the artifact store.

Secrets: the database password and the server's CSRF key are generated at `init` into
`DIR/secrets.json` (0600); the admin password comes from the user (`PSYFACE_ADMIN_PASSWORD` or
`--admin-password-file`, a 0600 file) and is stored only as MLflow's salted hash.

Hand-written because no library starts this trio: the steps are the ones the PostgreSQL and MLflow
manuals give (initdb, pg_ctl, `mlflow db upgrade`, `mlflow server`); users and roles go through
MLflow's own `AuthServiceClient`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from psyface.arguments import port_number, positive_int, seconds
from psyface.errors import PsyfaceError, entry_point
from psyface.io import output_folder, process_alive, write_json_atomic

CONFIG_FILE = "config.json"
SECRETS_FILE = "secrets.json"
STATE_FILE = "state.json"
AUTH_INI = "auth.ini"
PG_DIR = "postgres"
DB_USER = "psyface"
TRACKING_DB = "mlflow"
AUTH_DB = "mlflow_auth"
ADMIN_ENV = "PSYFACE_ADMIN_PASSWORD"
USER_PASSWORD_ENV = "PSYFACE_USER_PASSWORD"
MIN_PASSWORD = 12  # MLflow's basic-auth rule for every password
LOOPBACK = "127.0.0.1"
AUTH_CACHE_S = 60
# role -> what it may do on every experiment and registered model; `workspace` USE/MANAGE lets a role
# create resources where workspaces are on (with them off, MLflow lets any signed-in user create).
ROLES: dict[str, dict[str, str]] = {
    "read": {"experiment": "READ", "registered_model": "READ"},
    "edit": {"experiment": "EDIT", "registered_model": "EDIT", "workspace": "USE"},
    "manage": {"experiment": "MANAGE", "registered_model": "MANAGE", "workspace": "MANAGE"},
}
ROLE_PREFIX = "psyface-"


@dataclass
class ServerConfig:
    """What `init` fixed: where things live and who the admin is (no secrets)."""

    artifacts_destination: str
    admin_username: str = "admin"
    default_permission: str = "NO_PERMISSIONS"  # a new user sees nothing until given a role
    admin_created: bool = False


@dataclass
class ServerState:
    """What `start` launched, for `status` and `stop`."""

    url: str
    host: str
    port: int
    pg_port: int
    mlflow_pid: int


# ---------------------------------------------------------------- small helpers


def pg_bin(tool: str) -> str:
    """A PostgreSQL program: on PATH, else Debian's /usr/lib/postgresql/<newest>/bin."""
    found = shutil.which(tool)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    for folder in reversed(versions):
        if (folder / tool).is_file():
            return str(folder / tool)
    raise PsyfaceError(f"PostgreSQL's {tool} not found: install PostgreSQL (`apt-get install -y postgresql`, "
                       "or `make install-server`)")


def db_owner() -> str | None:
    """The unprivileged account that runs PostgreSQL when we are root (initdb/pg_ctl refuse root)."""
    if os.geteuid() != 0:
        return None
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        raise PsyfaceError("running as root but there is no `postgres` user to run PostgreSQL as; "
                           "install Debian's postgresql package or run psyface as a normal user") from None
    return "postgres"


def as_db_owner(command: list[str]) -> list[str]:
    owner = db_owner()
    return ["runuser", "-u", owner, "--", *command] if owner else command


def chown_to_db_owner(path: Path) -> None:
    owner = db_owner()
    if owner:
        shutil.chown(path, owner, owner)


def check_reachable(folder: Path) -> None:
    """PostgreSQL's account must be able to pass through every folder above its cluster."""
    owner = db_owner()
    if owner is None:
        return
    for ancestor in [folder, *folder.parents]:
        if ancestor.exists() and subprocess.run(["runuser", "-u", owner, "--", "test", "-x", str(ancestor)]).returncode:
            raise PsyfaceError(f"PostgreSQL runs as {owner!r}, which cannot enter {ancestor}; choose a server folder "
                               f"it can reach (e.g. under /srv) or `chmod o+x {ancestor}`")


def run(command: list[str], what: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run a helper program; its failure becomes one PsyfaceError naming `what` and its last output line."""
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if any(word in line.lower() for word in ("error", "fatal", "could not"))]
        raise PsyfaceError(f"{what} failed: {(errors or lines or [f'exit {result.returncode}'])[-1]}")
    return result.stdout


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def port_taken(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def read_secret_file(path: Path, what: str) -> str:
    """A password from a file only its owner can read (0600), first line, stripped."""
    if not path.is_file():
        raise PsyfaceError(f"{what} file {path} not found")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PsyfaceError(f"{what} file {path} is readable by others (mode {mode:04o}); `chmod 600 {path}` first")
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0].strip() if lines else ""


def password_from(file: Path | None, env: str, what: str, required: bool = True) -> str | None:
    """The password from `file` (0600) or environment variable `env`; checked against MLflow's rule."""
    password = read_secret_file(file, what) if file else os.environ.get(env)
    if not password:
        if required:
            raise PsyfaceError(f"the {what} is needed: set {env} or pass a 0600 file with --{what.replace(' ', '-')}-file")
        return None
    if len(password) < MIN_PASSWORD:
        raise PsyfaceError(f"the {what} must be at least {MIN_PASSWORD} characters (MLflow's rule)")
    return password


def write_private(path: Path, text: str) -> None:
    """Write a file only the owner can read, created 0600 (never briefly world-readable)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)


# ---------------------------------------------------------------- the server folder


class ServerDir:
    """The files of one server folder: config, secrets, state, the cluster and the logs."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.pg = self.root / PG_DIR
        self.pg_data = self.pg / "data"
        self.pg_log = self.pg / "postgres.log"
        self.mlflow_log = self.root / "logs" / "mlflow.log"

    def config(self) -> ServerConfig:
        path = self.root / CONFIG_FILE
        if not path.is_file():
            raise PsyfaceError(f"{self.root} is not a psyface server folder (no {CONFIG_FILE}): run `psyface server init {self.root}`")
        return ServerConfig(**json.loads(path.read_text(encoding="utf-8")))

    def save_config(self, config: ServerConfig) -> None:
        write_json_atomic(asdict(config), self.root / CONFIG_FILE)

    def secrets(self) -> dict[str, str]:
        return json.loads((self.root / SECRETS_FILE).read_text(encoding="utf-8"))

    def state(self) -> ServerState | None:
        path = self.root / STATE_FILE
        return ServerState(**json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None

    def database_uri(self, port: int, database: str) -> str:
        """SQLAlchemy URI with the driver named (2.1 maps a bare `postgresql://` to psycopg 3) and no
        password: libpq reads it from PGPASSWORD, so it never shows in `ps` or in a config file."""
        return f"postgresql+psycopg2://{DB_USER}@{LOOPBACK}:{port}/{database}"

    def postgres_port(self) -> int | None:
        """The port of this folder's running PostgreSQL, or None when it is not running."""
        pid_file = self.pg_data / "postmaster.pid"
        try:
            lines = pid_file.read_text(encoding="utf-8").splitlines()
        except OSError:
            return None
        return int(lines[3]) if len(lines) > 3 and lines[0].isdigit() and process_alive(int(lines[0])) else None

    def mlflow_running(self) -> ServerState | None:
        state = self.state()
        return state if state and process_alive(state.mlflow_pid) else None


def healthy(url: str, timeout: float = 5) -> bool:
    import requests

    try:
        return requests.get(f"{url}/health", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def url_of(host: str, port: int) -> str:
    shown = LOOPBACK if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


# ---------------------------------------------------------------- init / start / stop / status


def init(root: Path, artifacts_destination: str | None, admin_username: str) -> ServerDir:
    """Create the folder, the PostgreSQL cluster (password auth) and the generated secrets."""
    folder = ServerDir(root)
    if (output_folder(folder.root) / CONFIG_FILE).exists():
        raise PsyfaceError(f"{folder.root} is already a psyface server folder; `psyface server start {folder.root}`")
    if folder.root.exists() and any(folder.root.iterdir()):
        raise PsyfaceError(f"{folder.root} exists and is not empty; choose a new folder")
    initdb = pg_bin("initdb")
    check_reachable(folder.root.parent)
    created = not folder.root.exists()
    folder.root.mkdir(parents=True, exist_ok=True)
    folder.root.chmod(0o711)  # others may pass through (PostgreSQL's account reaches DIR/postgres), not list
    try:
        return _init(folder, initdb, artifacts_destination, admin_username)
    except BaseException:
        if created:  # a half-made folder would block the next `init`
            shutil.rmtree(folder.root, ignore_errors=True)
        raise


def _init(folder: ServerDir, initdb: str, artifacts_destination: str | None, admin_username: str) -> ServerDir:
    write_private(folder.root / SECRETS_FILE, json.dumps({"db_password": secrets.token_urlsafe(24),
                                                         "flask_secret_key": secrets.token_urlsafe(32)}))
    folder.pg.mkdir(mode=0o700)
    chown_to_db_owner(folder.pg)
    password_file = folder.pg / ".initdb-password"
    write_private(password_file, folder.secrets()["db_password"] + "\n")
    chown_to_db_owner(password_file)
    try:
        run(as_db_owner([initdb, "-D", str(folder.pg_data), "-U", DB_USER, "--auth=scram-sha-256",
                         f"--pwfile={password_file}", "-E", "UTF8", "--locale=C"]), "initdb")
    finally:
        password_file.unlink(missing_ok=True)
    artifacts = artifacts_destination or str(folder.root / "artifacts")
    if "://" not in artifacts:
        Path(artifacts).mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.save_config(ServerConfig(artifacts_destination=artifacts, admin_username=admin_username))
    return folder


def start_postgres(folder: ServerDir, timeout: float) -> int:
    """Start the cluster on a free loopback port (TCP only) unless it runs; returns its port."""
    port = folder.postgres_port()
    if port is None:
        port = free_port()
        options = f"-p {port} -c listen_addresses={LOOPBACK} -c unix_socket_directories=''"
        run(as_db_owner([pg_bin("pg_ctl"), "-D", str(folder.pg_data), "-l", str(folder.pg_log), "-o", options,
                         "-w", "-t", str(int(timeout)), "start"]), f"starting PostgreSQL (log: {folder.pg_log})",
            timeout=timeout + 30)
    import psycopg2

    connection = psycopg2.connect(host=LOOPBACK, port=port, user=DB_USER, dbname="postgres",
                                  password=folder.secrets()["db_password"], connect_timeout=30)
    connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
    try:
        with connection.cursor() as cursor:
            for database in (TRACKING_DB, AUTH_DB):
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{database}"')
    finally:
        connection.close()
    return port


def auth_ini(folder: ServerDir, config: ServerConfig, pg_port: int) -> Path:
    """MLflow's basic-auth config: its own database (in the same cluster); no password in it."""
    path = folder.root / AUTH_INI
    write_private(path, "\n".join([
        "[mlflow]",
        f"default_permission = {config.default_permission}",
        f"database_uri = {folder.database_uri(pg_port, AUTH_DB)}",
        f"admin_username = {config.admin_username}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access = false",
        # Without a cache every request re-hashes the password (PBKDF2, ~1 s on a busy 2-core machine);
        # the cost is that a changed password or removed user can keep working for up to this long.
        f"auth_cache_ttl_seconds = {AUTH_CACHE_S}",
        "",
    ]))
    return path


def mlflow_command() -> list[str]:
    """`mlflow` of this interpreter's environment (the server needs psycopg2 and Flask-WTF from it)."""
    return [sys.executable, "-m", "mlflow"]


def start(root: Path, host: str, port: int, workers: int, admin_password: str | None, timeout: float,
          allowed_hosts: str | None = None) -> ServerState:
    """PostgreSQL, schema upgrade, then `mlflow server` (detached, its own process group)."""
    folder = ServerDir(root)
    config = folder.config()
    running = folder.mlflow_running()
    if running:
        raise AlreadyRunning(running)
    if not config.admin_created and admin_password is None:
        raise PsyfaceError(f"the first start creates the admin user {config.admin_username!r}: set {ADMIN_ENV} "
                           "or pass --admin-password-file (a 0600 file)")
    if port_taken(host, port):
        raise PsyfaceError(f"port {port} on {host} is in use; pass another --port")
    pg_port = start_postgres(folder, timeout)
    tracking = folder.database_uri(pg_port, TRACKING_DB)
    environment = {**os.environ, "PGPASSWORD": folder.secrets()["db_password"],
                   "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini(folder, config, pg_port)),
                   "MLFLOW_FLASK_SERVER_SECRET_KEY": folder.secrets()["flask_secret_key"],
                   "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job workers: tracking only
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", ADMIN_ENV):
        environment.pop(name, None)
    run([*mlflow_command(), "db", "upgrade", tracking], "mlflow db upgrade", env=environment, timeout=timeout)
    if admin_password is not None:
        environment["MLFLOW_AUTH_ADMIN_PASSWORD"] = admin_password  # read once, to create the admin
    command = [*mlflow_command(), "server", "--backend-store-uri", tracking, "--serve-artifacts",
               "--artifacts-destination", config.artifacts_destination, "--app-name", "basic-auth",
               "--host", host, "--port", str(port), "--workers", str(workers)]
    if allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts]
    folder.mlflow_log.parent.mkdir(exist_ok=True)
    with open(folder.mlflow_log, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=environment, start_new_session=True, cwd=folder.root)
    state = ServerState(url=url_of(host, port), host=host, port=port, pg_port=pg_port, mlflow_pid=process.pid)
    deadline = time.monotonic() + timeout
    while not healthy(state.url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_mlflow(process.pid)
            tail = [line for line in folder.mlflow_log.read_text(errors="replace").splitlines() if line.strip()][-1:]
            why = "exited" if process.returncode is not None else f"was not up after {timeout:.0f} s"
            raise PsyfaceError(f"mlflow server {why} ({tail[0] if tail else 'no output'}; log: {folder.mlflow_log})")
        time.sleep(1)
    write_json_atomic(asdict(state), folder.root / STATE_FILE)
    if not config.admin_created:
        config.admin_created = True
        folder.save_config(config)
    return state


class AlreadyRunning(Exception):
    def __init__(self, state: ServerState) -> None:
        super().__init__(state.url)
        self.state = state


def stop_mlflow(pid: int, grace: float = 30) -> None:
    """SIGTERM the server's process group (uvicorn and its workers), SIGKILL what outlives `grace`."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            try:
                os.waitpid(pid, os.WNOHANG)  # reap it when we are its parent (tests, one process)
            except ChildProcessError:
                pass
            time.sleep(0.2)


def stop(root: Path) -> list[str]:
    folder = ServerDir(root)
    folder.config()
    stopped = []
    state = folder.state()
    if state and process_alive(state.mlflow_pid):
        stop_mlflow(state.mlflow_pid)
        stopped.append(f"mlflow server (pid {state.mlflow_pid})")
    (folder.root / STATE_FILE).unlink(missing_ok=True)
    if folder.postgres_port() is not None:
        run(as_db_owner([pg_bin("pg_ctl"), "-D", str(folder.pg_data), "-m", "fast", "-w", "stop"]), "stopping PostgreSQL")
        stopped.append("PostgreSQL")
    return stopped


def status(root: Path) -> tuple[bool, list[str]]:
    folder = ServerDir(root)
    config = folder.config()
    state = folder.mlflow_running()
    pg_port = folder.postgres_port()
    lines = [f"postgresql: {'running on ' + LOOPBACK + ':' + str(pg_port) if pg_port else 'stopped'}"]
    if state:
        health = "healthy" if healthy(state.url) else "not answering /health"
        lines.append(f"mlflow server: running (pid {state.mlflow_pid}) at {state.url}, {health}")
    else:
        lines.append("mlflow server: stopped")
    lines.append(f"artifacts: {config.artifacts_destination}")
    return bool(state and pg_port), lines


# ---------------------------------------------------------------- users


def server_url(dir_: Path | None, url: str | None) -> str:
    if url:
        return url.rstrip("/")
    if dir_:
        state = ServerDir(dir_).mlflow_running()
        if state is None:
            raise PsyfaceError(f"the server in {dir_} is not running: `psyface server start {dir_}`")
        return state.url
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    raise PsyfaceError("which server? pass --dir DIR or --url URL (or set MLFLOW_TRACKING_URI=http://...)")


def add_user(url: str, admin: tuple[str, str], name: str, role: str, password: str) -> bool:
    """Create user `name` (or keep the existing one and their password) and give them exactly the
    psyface role `role`; True when the user was created."""
    import warnings

    from mlflow.exceptions import MlflowException
    from mlflow.utils.workspace_utils import DEFAULT_WORKSPACE_NAME

    with warnings.catch_warnings():  # the client imports the server app, which warns about Starlette
        warnings.simplefilter("ignore")
        from mlflow.server.auth.client import AuthServiceClient

    previous = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = admin
    try:
        client = AuthServiceClient(url)
        try:
            client.create_user(name, password)
            created = True
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            created = False
        roles = {r.name: r for r in client.list_roles(DEFAULT_WORKSPACE_NAME)}
        wanted = roles.get(ROLE_PREFIX + role)
        if wanted is None:
            wanted = client.create_role(DEFAULT_WORKSPACE_NAME, ROLE_PREFIX + role, f"psyface {role} access")
            for resource_type, permission in ROLES[role].items():
                client.add_role_permission(wanted.id, resource_type, "*", permission)
        held = {r.name: r for r in client.list_user_roles(name)}
        for other in held.values():
            if other.name.startswith(ROLE_PREFIX) and other.name != wanted.name:
                client.unassign_role(name, other.id)
        if wanted.name not in held:
            client.assign_role(name, wanted.id)
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return created


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="psyface server", description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("init", help="create the server folder: PostgreSQL cluster, secrets, config")
    p.add_argument("dir", type=Path)
    p.add_argument("--artifacts-destination", help="artifact store the server proxies (default DIR/artifacts; s3://, gs:// ...)")
    p.add_argument("--admin-username", default="admin")
    p = verbs.add_parser("start", help="start PostgreSQL and the MLflow server (basic-auth)")
    p.add_argument("dir", type=Path)
    p.add_argument("--host", default=LOOPBACK, help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=port_number, default=5000)
    p.add_argument("--workers", type=positive_int, default=4, help="uvicorn worker processes")
    p.add_argument("--allowed-hosts", help="Host headers MLflow accepts when serving beyond this machine")
    p.add_argument("--admin-password-file", type=Path, help=f"0600 file with the admin password (else ${ADMIN_ENV}); first start only")
    p.add_argument("--timeout", type=seconds, default=180, help="seconds to wait for the server to come up")
    for verb, help_ in (("stop", "stop the MLflow server and PostgreSQL"), ("status", "say what runs")):
        verbs.add_parser(verb, help=help_).add_argument("dir", type=Path)
    p = verbs.add_parser("user", help="manage users")
    p.add_argument("action", choices=["add"])
    p.add_argument("name")
    p.add_argument("--role", choices=list(ROLES), required=True)
    p.add_argument("--password-file", type=Path, help=f"0600 file with the new user's password (else ${USER_PASSWORD_ENV}, else generated)")
    p.add_argument("--admin-password-file", type=Path, help=f"0600 file with the admin password (else ${ADMIN_ENV})")
    p.add_argument("--admin-username", default=None, help="default: the server folder's admin, else 'admin'")
    p.add_argument("--dir", type=Path, help="the server folder (its URL and admin name)")
    p.add_argument("--url", help="the server URL (default $MLFLOW_TRACKING_URI)")
    p = verbs.add_parser("import", help="copy a local store (mlruns/) onto the server")
    p.add_argument("store", type=Path, help="a local store folder (holding mlflow.db) or a .db file")
    p.add_argument("--dir", type=Path, help="the server folder (its URL)")
    p.add_argument("--url", help="the server URL (default $MLFLOW_TRACKING_URI); credentials from MLFLOW_TRACKING_USERNAME/PASSWORD")
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verb == "init":
        folder = init(args.dir, args.artifacts_destination, args.admin_username)
        print(f"psyface server: initialised {folder.root}; next: {ADMIN_ENV}=... psyface server start {folder.root}")
    elif args.verb == "start":
        password = password_from(args.admin_password_file, ADMIN_ENV, "admin password", required=False)
        try:
            state = start(args.dir, args.host, args.port, args.workers, password, args.timeout, args.allowed_hosts)
        except AlreadyRunning as running:
            print(f"psyface server: already running at {running.state.url} (pid {running.state.mlflow_pid})")
            return 0
        print(f"psyface server: MLflow at {state.url} (PostgreSQL on {LOOPBACK}:{state.pg_port}, pid {state.mlflow_pid})\n"
              f"clients: export MLFLOW_TRACKING_URI={state.url} MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=...")
    elif args.verb == "stop":
        stopped = stop(args.dir)
        print(f"psyface server: stopped {', '.join(stopped)}" if stopped else "psyface server: nothing was running")
    elif args.verb == "status":
        up, lines = status(args.dir)
        print("\n".join(lines))
        return 0 if up else 3
    elif args.verb == "user":
        url = server_url(args.dir, args.url)
        admin_name = args.admin_username or (ServerDir(args.dir).config().admin_username if args.dir else "admin")
        admin = (admin_name, password_from(args.admin_password_file, ADMIN_ENV, "admin password"))
        given = password_from(args.password_file, USER_PASSWORD_ENV, "password", required=False)
        password = given or secrets.token_urlsafe(18)
        created = add_user(url, admin, args.name, args.role, password)
        print(f"psyface server: user {args.name!r} {'created' if created else 'exists (password unchanged)'}, role {args.role}")
        if created and given is None:
            print(f"password for {args.name!r} (shown once): {password}")
    elif args.verb == "import":
        from psyface.store_copy import copy_store, local_store_uri

        url = server_url(args.dir, args.url)
        summary = copy_store(local_store_uri(args.store), url)
        print(f"psyface server: imported into {url}: " + ", ".join(f"{count} {what}" for what, count in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
