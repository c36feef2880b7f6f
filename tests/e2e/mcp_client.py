"""An agent's MCP session with Airlock, through the official Python MCP SDK.

Usage: mcp_client.py http URL TOKEN | mcp_client.py stdio AIRLOCK_BINARY
(stdio reads AIRLOCK_URL and AIRLOCK_TOKEN from the environment, as `airlock mcp` does).

Runs one scripted task and prints one JSON line per step: {"step", "is_error",
"result"} with the tool's structured result. The test that runs it asserts on the
lines and on what happened upstream; at the "pending" step it approves the grant as an
operator would, while this client waits in wait_for_review.
"""

import asyncio
import json
import os
import sys

from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

TASK = "confirm migration 42 ran"
WRITE_TASK = "fix the broken name of user 1"


def report(step, result):
    print(
        json.dumps(
            {"step": step, "is_error": bool(result.is_error), "result": result.structured_content}
        ),
        flush=True,
    )
    return result.structured_content or {}


async def task(session):
    await session.initialize()
    tools = await session.list_tools()
    print(json.dumps({"step": "tools", "result": sorted(t.name for t in tools.tools)}), flush=True)
    call = session.call_tool
    report("targets", await call("list_targets", {}))
    read = report("request_read", await call("request_access", {"target": "prod-db", "task": TASK}))
    grant = read.get("grant")
    report(
        "select",
        await call("sql_query", {"grant": grant, "sql": "SELECT id, email, name FROM users ORDER BY id"}),
    )
    report(
        "params",
        await call("sql_query", {"grant": grant, "sql": "SELECT name FROM users WHERE id = $1", "params": [2]}),
    )
    report("capped", await call("sql_query", {"grant": grant, "sql": "SELECT id FROM users", "max_rows": 1}))
    report(
        "write_on_read",
        await call("sql_query", {"grant": grant, "sql": "UPDATE users SET name = 'Mallory' WHERE id = 1"}),
    )
    report("sql_error", await call("sql_query", {"grant": grant, "sql": "SELECT * FROM no_such_table"}))
    write = report(
        "pending",
        await call("request_access", {"target": "prod-db", "task": WRITE_TASK, "access": "write"}),
    )
    report("approved", await call("wait_for_review", {"grant": write.get("grant"), "timeout_seconds": 60}))
    report(
        "write",
        await call(
            "sql_query",
            {"grant": write.get("grant"), "sql": "UPDATE users SET name = $1 WHERE id = 1", "params": ["Alicia"]},
        ),
    )
    report("end_write", await call("end_access", {"grant": write.get("grant")}))
    report("end_read", await call("end_access", {"grant": grant}))
    report("after_end", await call("sql_query", {"grant": grant, "sql": "SELECT 1"}))


async def main():
    mode = sys.argv[1]
    if mode == "http":
        url, token = sys.argv[2], sys.argv[3]
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
        async with http, streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                await task(session)
    else:
        env = {k: v for k, v in os.environ.items() if k.startswith("AIRLOCK_")}
        server = StdioServerParameters(command=sys.argv[2], args=["mcp"], env=env)
        async with stdio_client(server) as (read, write):
            async with ClientSession(read, write) as session:
                await task(session)


asyncio.run(main())
