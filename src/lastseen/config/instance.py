"""The instance's one name, which its leases, its spool file and its status page carry."""

from __future__ import annotations

import socket
import uuid

from lastseen.config.settings import Settings


def named(settings: Settings) -> Settings:
    """``settings`` with the instance's one name in ``instance_id``, resolved once by the
    composition root for everything that names the instance (its leases, its spool file, its
    status page): as given, else the host name and listen port, which a restart on the same
    machine keeps. An instance on a port chosen at random has no successor to take anything
    back, so it gets a name of its own."""
    if settings.instance_id:
        return settings
    port = settings.listen[1]
    suffix = str(port) if port else uuid.uuid4().hex[:12]
    return settings.replace(instance_id=f"{socket.gethostname()}:{suffix}")


def instance_name(settings: Settings) -> str:
    """The name ``named`` gave the instance."""
    if settings.instance_id is None:
        raise ValueError("settings without an instance name: pass them through named()")
    return settings.instance_id
