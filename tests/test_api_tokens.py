"""API tokens over the JATOS API (formats-and-api.md §3.1-§3.2, §3.5): create, list, read,
(de)activate, delete; a token works exactly while it is active."""

from __future__ import annotations

import webtest

from conftest import AUTH

BASE = "/jatos/api/v1"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def create(client: webtest.TestApp, status: int = 201, **body: object) -> dict:
    return client.post_json(f"{BASE}/users/1/tokens", body, headers=AUTH, status=status).json


def test_a_created_token_is_returned_once_and_opens_the_api(client: webtest.TestApp) -> None:
    made = create(client, name="jatosR")["data"]
    assert made["token"].startswith("jap_") and len(made["token"]) == 41
    assert made["expiresAfter"] == 3600 and made["expirationDate"] == made["creationDate"] + 3_600_000
    assert client.get(f"{BASE}/admin/token", headers=bearer(made["token"])).json["data"]["name"] == "jatosR"
    listed = client.get(f"{BASE}/users/1/tokens", headers=AUTH).json["data"]
    assert [t["name"] for t in listed] == ["jatosR"] and "token" not in listed[0]
    assert client.get(f"{BASE}/tokens/{made['id']}", headers=AUTH).json["data"]["active"] is True


def test_expires_after_zero_never_expires(client: webtest.TestApp) -> None:
    made = create(client, name="lab laptop", expiresAfter=0)["data"]
    assert (made["expiresAfter"], made["expirationDate"], made["isExpired"]) == (None, 0, False)


def test_a_deactivated_token_stops_working_until_activated(client: webtest.TestApp) -> None:
    made = create(client, name="script")["data"]
    path = f"{BASE}/tokens/{made['id']}"
    assert client.patch_json(path, {"active": False}, headers=AUTH).json["data"] == {"id": made["id"], "active": False}
    client.get(f"{BASE}/admin/token", headers=bearer(made["token"]), status=401)
    client.patch_json(path, {"active": True}, headers=AUTH)
    client.get(f"{BASE}/admin/token", headers=bearer(made["token"]), status=200)


def test_a_deleted_token_is_gone(client: webtest.TestApp) -> None:
    made = create(client, name="old")["data"]
    assert client.delete(f"{BASE}/tokens/{made['id']}", headers=AUTH).json["message"] == "Token deleted successfully"
    client.get(f"{BASE}/tokens/{made['id']}", headers=AUTH, status=404)
    client.get(f"{BASE}/admin/token", headers=bearer(made["token"]), status=401)


def test_bad_token_requests_are_refused(client: webtest.TestApp) -> None:
    assert create(client, status=400)["error"]["code"] == "INVALID_REQUEST"
    create(client, status=400, name="x", expiresAfter=-5)
    create(client, status=400, name="x", colour="red")
    client.post_json(f"{BASE}/users/7/tokens", {"name": "x"}, headers=AUTH, status=404)
    client.patch_json(f"{BASE}/tokens/1", {"active": "yes"}, headers=AUTH, status=400)
    client.get(f"{BASE}/tokens/999", headers=AUTH, status=404)
    client.post_json(f"{BASE}/users/1/tokens", {"name": "x"}, status=401)
