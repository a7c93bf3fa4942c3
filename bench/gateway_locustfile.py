"""Locust users for `python -m bench.gateway_load` (which starts the gateway and passes, in the
environment, the tenant's API key, the avatar to open sessions on and the portrait to upload).

Two request kinds are measured: "avatar upload" (POST /v1/avatars: validate, crop, encode, store)
and "session create" (POST /v1/sessions); each created session is stopped right away
("session stop", DELETE) so the tenant stays under its concurrent-session quota."""

from __future__ import annotations

import os
import uuid

from locust import HttpUser, between, task

API_KEY = os.environ["AF_LOAD_API_KEY"]
AVATAR_ID = os.environ["AF_LOAD_AVATAR_ID"]
with open(os.environ["AF_LOAD_PORTRAIT"], "rb") as _file:
    PORTRAIT = _file.read()


class GatewayUser(HttpUser):
    wait_time = between(0.05, 0.15)

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    @task(3)
    def create_session(self) -> None:
        with self.client.post("/v1/sessions", json={"avatar_id": AVATAR_ID}, name="session create",
                              catch_response=True) as response:  # fmt: skip
            if response.status_code != 201:
                response.failure(f"status {response.status_code}")
                return
            session_id = response.json()["session_id"]
        self.client.delete(f"/v1/sessions/{session_id}", name="session stop")

    @task(1)
    def upload_avatar(self) -> None:
        files = {"portrait": ("portrait.png", PORTRAIT, "image/png")}
        data = {"avatar_id": f"load-{uuid.uuid4().hex[:12]}"}
        self.client.post("/v1/avatars", files=files, data=data, name="avatar upload")
