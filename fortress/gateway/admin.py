"""The gateway's own admin API: ``/admin/replicas`` (list, add, drain), beside the access layer's
``/admin/keys`` and ``/admin/plans``. Reached only after the admin check."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from fortress.config import Tier
from fortress.core import errors
from fortress.core.asgi import Send, respond_error, respond_json
from fortress.routing.pool import NamingError, Router


class ReplicaAdmin:
    """``GET /admin/replicas``: the replica table (and the supervised processes, when any);
    ``POST`` adds a replica ``{url, tier, model, name}``; ``DELETE /admin/replicas/{name}`` drains
    and removes one."""

    def __init__(self, router: Router, processes: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        self.router = router
        self.processes = processes

    def status(self) -> dict[str, Any]:
        """The replica table behind ``fortress status``."""
        pools = [
            {
                "name": pool.name,
                "model": pool.model,
                "aliases": list(pool.config.aliases),
                "balancer": pool.config.balancer,
                "replicas": [r.snapshot() for r in pool.replicas],
            }
            for pool in self.router.pools
        ]
        ready, missing = self.router.ready()
        out: dict[str, Any] = {"ready": ready, "models_without_healthy_replica": missing, "pools": pools}
        dormant = self.router.dormant()
        if dormant:  # pools the fleet keeps at zero on purpose
            out["dormant"] = dormant
        if self.processes is not None:
            out["processes"] = self.processes()
        return out

    async def handle(self, method: str, path: str, body: bytes, send: Send) -> bool:
        """Answer a ``/admin/replicas`` request; False when the path is not this API's."""
        if path == "/admin/replicas":
            if method == "GET":
                await respond_json(send, 200, self.status())
            elif method == "POST":
                await self._add(body, send)
            else:
                await respond_error(send, errors.method_not_allowed("Use GET or POST for /admin/replicas."))
            return True
        if path.startswith("/admin/replicas/"):
            if method != "DELETE":
                await respond_error(send, errors.method_not_allowed("Use DELETE for /admin/replicas/{name}."))
                return True
            name = path[len("/admin/replicas/") :]
            replica = self.router.replica_named(name)
            if replica is None:
                await respond_error(send, _bad(f"No replica named {name!r}.", 404))
                return True
            await self.router.drain(replica)
            await respond_json(send, 200, {"removed": name})
            return True
        return False

    async def _add(self, body: bytes, send: Send) -> None:
        try:
            req = orjson.loads(body or b"{}")
            url = str(req["url"])
            tier = Tier(req.get("tier", "primary"))
            model = req.get("model")
            name = req.get("name")
            if name is not None and not (isinstance(name, str) and name):
                raise ValueError("'name' must be a non-empty string")
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError) as exc:
            await respond_error(send, _bad(f"Bad replica: {exc}"))
            return
        if not url.startswith(("http://", "https://")):
            await respond_error(
                send, _bad("Bad replica: 'url' must start with http:// or https://", param="url")
            )
            return
        try:
            pool = self.router.pool_for_model(model)
            if pool is None:
                await respond_error(send, _bad(f"No pool for model {model!r}.", 404))
                return
            replica = self.router.add_replica(pool, url, tier, name=name)
        except NamingError as exc:
            await respond_error(send, _bad(str(exc), 409, param="name"))
            return
        await respond_json(send, 201, replica.snapshot())


def _bad(message: str, status: int = 400, param: str | None = None) -> errors.GatewayError:
    return errors.GatewayError(status, message, "invalid_request_error", param=param)
