"""A local SQLite answer cache, safe for many threads in one process and several processes on one machine.

WAL mode lets readers run while one writer commits; `busy_timeout` makes concurrent writers wait their turn
instead of failing. Each thread gets its own connection (sqlite3 connections are not shared across threads).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from typing import Iterable, Mapping

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    answer TEXT NOT NULL,
    created REAL NOT NULL
) WITHOUT ROWID
"""
_CHUNK = 500  # keys per SELECT (SQLite caps bound parameters)


class SqliteAnswerCache:
    def __init__(self, path: str, *, timeout: float = 60.0) -> None:
        self.path = path
        self._timeout = timeout
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        self._conn()  # create the file and table now, so a bad path fails before any work

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def get_many(self, keys: Iterable[str]) -> Mapping[str, str]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, str] = {}
        conn = self._conn()
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for key, answer in conn.execute(f"SELECT key, answer FROM answers WHERE key IN ({marks})", chunk):
                found[key] = answer
        return found

    def put_many(self, items: Iterable[tuple[str, str]]) -> None:
        now = time.time()
        rows = [(k, a, now) for k, a in items]
        if not rows:
            return
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT OR REPLACE INTO answers (key, answer, created) VALUES (?, ?, ?)", rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._connections.clear()
        self._local = threading.local()
