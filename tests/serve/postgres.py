"""A throwaway PostgreSQL server for the tests: ``url, stop = start_postgres()``.

Uses Debian's ``/usr/lib/postgresql/*/bin`` (installed with apt-get when missing and running as root;
otherwise the tests that need it skip, or fail when CI=true). PostgreSQL refuses to run as root: as root,
the data folder is made under /tmp (pytest's tmp folders are root-only) and owned by the ``postgres``
user, who runs initdb and pg_ctl. The server listens on 127.0.0.1 at a free port, trusts the role
``veil`` and has a database ``veil``; fsync is off (a test server need not survive a crash).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile

import pytest


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL is needed in CI: {reason}", pytrace=False)
    pytest.skip(f"no PostgreSQL: {reason}")


def _bin_dir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "postgresql"], env=env, capture_output=True)
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        _unavailable("no /usr/lib/postgresql/*/bin/initdb (install Debian's postgresql package)")
    return os.path.dirname(found[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_postgres(workdir_parent=None):
    """Start a server; returns (``postgresql://veil@127.0.0.1:PORT/veil``, stop), stop() removing everything."""
    bin_dir, root = _bin_dir(), os.geteuid() == 0
    if root:
        try:
            pg = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root, and there is no postgres user to run the server as")
        work = tempfile.mkdtemp(prefix="veil-pg-", dir="/tmp")  # not under pytest's root-only tmp folders
        os.chown(work, pg.pw_uid, pg.pw_gid)
    else:
        work = tempfile.mkdtemp(prefix="veil-pg-", dir=workdir_parent)
    data, port = os.path.join(work, "data"), _free_port()

    def run(*args, check=True):
        cmd = [os.path.join(bin_dir, args[0]), *args[1:]]
        if root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def stop():
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            run("pg_ctl", "-D", data, "stop", "-m", "immediate", check=False)
        shutil.rmtree(work, ignore_errors=True)

    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {work} -c fsync=off -c synchronous_commit=off"
    try:
        run("initdb", "-D", data, "--auth=trust", "-U", "veil", "--encoding=UTF8", "--no-sync")
        run("pg_ctl", "-D", data, "-o", options, "-l", os.path.join(work, "log"), "-w", "-t", "60", "start")
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "veil", "veil")
    except RuntimeError as e:
        log = os.path.join(work, "log")
        tail = open(log).read()[-2000:] if os.path.exists(log) else ""
        stop()
        raise RuntimeError(f"PostgreSQL did not start: {e}\nits log ends:\n{tail}") from None
    return f"postgresql://veil@127.0.0.1:{port}/veil", stop
