def test_annotate_returns_mask(client, session_id):
    r = client.post(f"/annotate-frame/{session_id}",
                    json={"frame_idx": 0, "points": [{"x": 45, "y": 55, "label": 1}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["obj_ids"] == [1]
    assert client.get(body["mask_url"]).status_code == 200
