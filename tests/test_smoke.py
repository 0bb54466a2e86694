from conftest import AUTH


def test_a_participant_runs_a_study_and_the_data_comes_back(lab, client):
    study = lab.study()
    code = lab.code(study["id"], "gm")
    start = client.get(f"/publix/{code}", status=303).follow()
    base = start.request.path.rsplit("/", 1)[0]
    client.post(base + "/resultData", "héllo", headers={"Content-Type": "text/plain; charset=UTF-8"})
    client.get(base.rsplit("/", 1)[0] + "/end", status=303)
    text = client.get(f"/jatos/api/v1/results/data?studyId={study['id']}&asPlainText=true", headers=AUTH)
    assert text.body == "héllo\n".encode()


def test_live_server_answers_ping(live_server):
    import urllib.request
    assert urllib.request.urlopen(live_server.url + "/ping").read() == b"pong"
