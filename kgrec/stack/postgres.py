"""PostgreSQL from the machine's server binaries: one cluster in the stack folder, TCP on loopback
only, SCRAM passwords, the databases ``mlflow`` and ``prefect`` owned by one application role."""

from __future__ import annotations

import base64
import contextlib
import glob
import hashlib
import hmac
import os
import pwd
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import psutil
import psycopg
from psycopg import sql

from kgrec.stack.processes import StackError, alive, log_tail, stop_tree
from kgrec.stack.settings import DATABASES, Layout, Secrets

SUPERUSER = "postgres"
#: Postgres refuses to run as root; root runs it as this system user (Debian's package creates it).
SYSTEM_USER = "postgres"

INSTALL_HINT = "install them with `apt-get install postgresql` (Debian/Ubuntu; `make test` does it as root)"


def find_bindir() -> Path:
    """The server binaries: ``pg_config --bindir``, else the newest /usr/lib/postgresql/*/bin, else PATH."""
    candidates: list[Path] = []
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            candidates.append(Path(out.stdout.strip()))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                      if Path(p).parent.name.isdigit() else 0, reverse=True)
    candidates += [Path(p) for p in versions]
    if pg_ctl := shutil.which("pg_ctl"):
        candidates.append(Path(pg_ctl).parent)
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise StackError(f"PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: {INSTALL_HINT}")


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 secret Postgres stores (RFC 5802/7677), computed here so the plain
    password never travels in a statement (nor lands in the server log on an error)."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(hashlib.sha256(client_key).digest())}:{b64(server_key)}"


class Postgres:
    """One cluster in ``<stack>/postgres/data``."""

    def __init__(self, layout: Layout, port: int, secrets: Secrets, host: str = "127.0.0.1") -> None:
        self.layout, self.port, self.secrets, self.host = layout, port, secrets, host
        self.as_root = os.geteuid() == 0
        self.log_file = layout.log_file("postgres")

    # -- who runs it ---------------------------------------------------------------------------
    def _system_user(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise StackError(
                f"Postgres refuses to run as root and there is no `{SYSTEM_USER}` user: {INSTALL_HINT} "
                "(it creates the user), or run `kgrec stack up` as a normal user"
            ) from None

    def _own(self, path: Path) -> None:
        if self.as_root:
            user = self._system_user()
            os.chown(path, user.pw_uid, user.pw_gid)

    def _run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        if self.as_root:
            self._system_user()
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"
            argv = [runuser, "-u", SYSTEM_USER, "--", *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}
        with open(self.log_file, "ab") as log:
            # pg_ctl's own messages go to the server log; the postmaster detaches from them
            return subprocess.run(argv, env=env, cwd=self.layout.pg_root, stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                  start_new_session=True)

    # -- lifecycle -----------------------------------------------------------------------------
    def pid(self) -> int | None:
        """The postmaster's pid when it runs (its first line of ``postmaster.pid``)."""
        try:
            pid = int((self.layout.pg_data / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError, PermissionError):
            return None
        return pid if alive(pid, "postgres") else None

    def running_port(self) -> int | None:
        try:  # line 4 of postmaster.pid is the port
            return int((self.layout.pg_data / "postmaster.pid").read_text().splitlines()[3])
        except (FileNotFoundError, ValueError, IndexError, PermissionError):
            return None

    def initialized(self) -> bool:
        return (self.layout.pg_data / "PG_VERSION").exists()

    def init(self, bindir: Path) -> None:
        data = self.layout.pg_data
        self.log_file.touch()
        self._own(self.log_file)
        self._own(self.layout.pg_root)
        if self.as_root and self._run(["test", "-w", str(self.layout.pg_root)], 10).returncode != 0:
            raise StackError(
                f"the `{SYSTEM_USER}` user cannot reach {self.layout.pg_root} (Postgres refuses to run as "
                "root): make its parent folders traversable (chmod o+x) or pick another --dir, e.g. under /srv"
            )
        if self.initialized():
            return
        data.mkdir(mode=0o700, exist_ok=True)
        self._own(data)
        pwfile = self.layout.pg_root / ".superuser-password"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.secrets.superuser_password + "\n")
        self._own(pwfile)
        try:
            result = self._run([
                str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, f"--pwfile={pwfile}",
                "--encoding=UTF8", "--locale=C", "--auth-host=scram-sha-256", "--auth-local=reject",
            ], timeout=300)
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise StackError(f"initdb failed; end of {self.log_file}:\n{log_tail(self.log_file)}")
        # Loopback TCP with SCRAM only: no Unix socket (no socket-directory permissions to get right,
        # and no peer/trust path around the password).
        with open(data / "postgresql.conf", "a") as conf:
            conf.write("\n# kgrec stack\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
                       "password_encryption = 'scram-sha-256'\n")
        (data / "pg_hba.conf").write_text(
            "# kgrec stack: TCP on 127.0.0.1 only, SCRAM-SHA-256 passwords\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )

    def start(self, bindir: Path, timeout: float) -> int:
        # The port goes on the command line, not into postgresql.conf: stack.json may move it.
        result = self._run([
            str(bindir / "pg_ctl"), "-D", str(self.layout.pg_data), "-l", str(self.log_file),
            "-o", f"-p {self.port}", "-w", "-t", str(int(timeout)), "start",
        ], timeout=timeout + 30)
        pid = self.pid()
        if result.returncode != 0 or pid is None:
            raise StackError(f"Postgres did not start; end of {self.log_file}:\n{log_tail(self.log_file)}")
        self.layout.pid_file("postgres").write_text(f"{pid}\n")
        return pid

    def stop(self, bindir: Path, timeout: float) -> list[int]:
        pid = self.pid()
        if pid is None:
            return []
        pids = [pid] + [c.pid for c in _children(pid)]
        self._run([str(bindir / "pg_ctl"), "-D", str(self.layout.pg_data), "-m", "fast", "-w",
                   "-t", str(int(timeout)), "stop"], timeout=timeout + 30)
        if alive(pid):  # a fast shutdown that hangs: kill the postmaster and its backends
            stop_tree(pid, timeout=5)
        return pids

    # -- databases -----------------------------------------------------------------------------
    def connect(self, dbname: str = "postgres", superuser: bool = True) -> psycopg.Connection:
        user, password = ((SUPERUSER, self.secrets.superuser_password) if superuser
                          else (self.secrets.db_user, self.secrets.db_password))
        return psycopg.connect(host=self.host, port=self.port, user=user, password=password,
                               dbname=dbname, autocommit=True, connect_timeout=5)

    def ensure_databases(self) -> None:
        """The application role (password from secrets.json) and its databases; idempotent."""
        user = self.secrets.db_user
        with self.connect() as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(user), sql.Literal(scram_verifier(self.secrets.db_password))))
            for db in DATABASES:
                if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
                    conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(db), sql.Identifier(user)))

    def url(self, dbname: str, driver: str) -> str:
        """SQLAlchemy URL of ``dbname`` for the application role (``driver``: psycopg, asyncpg)."""
        pw = quote(self.secrets.db_password, safe="")
        return f"postgresql+{driver}://{self.secrets.db_user}:{pw}@{self.host}:{self.port}/{dbname}"


def _children(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []
