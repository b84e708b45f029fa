"""A throw-away PostgreSQL server for the tests: ``initdb`` in a temp folder, a free local port, stopped after.

PostgreSQL refuses to run as root, so under root (CI here) the server runs as the ``postgres`` user (else
``nobody``) through ``runuser``, in a folder that user owns. The test using it is skipped, with the reason,
only where no server can be started.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def _binary(name: str) -> str | None:
    # Debian installs the server binaries off the PATH; the newest version wins.
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_server_user():
    """(command prefix, uid, gid) to run the server's binaries with: nothing to change unless we are root."""
    if os.geteuid() != 0:
        return [], None, None
    import pwd

    runuser = shutil.which("runuser")
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        if runuser:
            return [runuser, "-u", name, "--"], user.pw_uid, user.pw_gid
    pytest.skip("PostgreSQL cannot run as root and neither runuser nor a 'postgres'/'nobody' user is available here.")


def _run(prefix, *command, timeout=60):
    return subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def postgres_url():
    """A SQLAlchemy URL of an empty database on a fresh local server."""
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are neither on the PATH nor under /usr/lib/postgresql/*/bin; "
                    "install PostgreSQL (Debian: apt-get install postgresql) to run this test.")
    try:
        import psycopg2
    except ImportError:
        pytest.skip("The PostgreSQL driver psycopg2 is not installed: pip install -e '.[test]'.")
    prefix, uid, gid = _as_server_user()
    folder = Path(tempfile.mkdtemp(prefix="tier3-postgres-"))
    if uid is not None:
        os.chown(folder, uid, gid)
    data, log = folder / "data", folder / "server.log"
    made = _run(prefix, initdb, "-D", str(data), "-U", "tier3", "--auth=trust", "-E", "UTF8", "--no-sync")
    if made.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"initdb failed, so no PostgreSQL server can be started here: {made.stderr.strip()[-500:]}")
    started, port = None, None
    for _ in range(3):  # the free port may be taken between probing and binding
        port = _free_port()
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        started = _run(prefix, pg_ctl, "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", "30", "start")
        if started.returncode == 0:
            break
    if started.returncode != 0:
        tail = log.read_text()[-500:] if log.exists() else started.stderr[-500:]
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"The PostgreSQL server did not start: {tail}")
    try:
        connection = psycopg2.connect(host="127.0.0.1", port=port, user="tier3", dbname="postgres")
        connection.autocommit = True
        connection.cursor().execute("CREATE DATABASE search")
        connection.close()
        yield f"postgresql+psycopg2://tier3@127.0.0.1:{port}/search"
    finally:
        _run(prefix, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)
