"""No starvation: requests piling up on one busy session neither hold the threads that serve
everyone else nor wait without bound (409 + Retry-After past SAM2_SESSION_QUEUE)."""

from __future__ import annotations

import queue
import threading

import pytest
from fastapi.testclient import TestClient
from test_api import CLICK, assert_error, upload

from main import create_app
from sam2_manager import SAM2Manager

CLICKS = 60


class AnnouncingLock:
    """A session's work lock that tells the test when a request starts waiting for it."""

    def __init__(self, arrived: threading.Semaphore):
        self._lock = threading.Lock()
        self._arrived = arrived

    def hold(self) -> None:
        self._lock.acquire()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if blocking:
            self._arrived.release()
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


@pytest.fixture
def roomy(settings, predictor):
    # Waiting clicks must not time out while the test looks at them.
    s = settings.model_copy(update={"session_lock_timeout_s": 600, "session_queue": 4})
    mgr = SAM2Manager(s, predictor=predictor)
    with TestClient(create_app(s, mgr)) as c:
        c.manager = mgr
        yield c


def click(client, sid, x=CLICK[0]):
    return client.post(f"/refine-mask/{sid}",
                       json={"frame_idx": 0, "points": [{"x": x, "y": CLICK[1], "label": 1}]})


def test_clicks_piling_on_a_busy_session_starve_nobody(roomy, video):
    a = upload(roomy, video).json()["session_id"]
    b = upload(roomy, video).json()["session_id"]
    assert click(roomy, a).status_code == 200 and click(roomy, b).status_code == 200
    session_a = roomy.manager.sessions[a]
    queue_size = roomy.manager.settings.session_queue

    session_a.work_lock.acquire()  # as a long propagation on A would
    results: queue.Queue = queue.Queue()
    threads = [threading.Thread(target=lambda x=20 + i % 100: results.put(click(roomy, a, x)))
               for i in range(CLICKS)]
    try:
        for t in threads:
            t.start()
        # All but the queue's worth are refused at once, with a Retry-After.
        refused = [results.get(timeout=120) for _ in range(CLICKS - queue_size)]
        for r in refused:
            assert_error(r, 409, "session_busy")
            assert int(r.headers["Retry-After"]) >= 1
        assert session_a.waiting == queue_size
        # Meanwhile everything else answers, although A's queue is full.
        assert roomy.get("/health").status_code == 200
        for url in (f"/frame/{b}/3", f"/mask/{b}/0", f"/overlay/{b}/0", f"/session/{b}",
                    f"/frame/{a}/2", f"/mask/{a}/0", f"/overlay/{a}/0", "/sessions",
                    "/metrics"):
            assert roomy.get(url).status_code == 200, url
        assert click(roomy, b).status_code == 200  # model work on another session too
        assert results.empty()  # the queued clicks are still waiting
    finally:
        session_a.work_lock.release()
    waited = [results.get(timeout=120) for _ in range(queue_size)]
    assert [r.status_code for r in waited] == [200] * queue_size
    for t in threads:
        t.join(timeout=60)
    assert session_a.waiting == 0


def test_full_queues_on_every_session_leave_the_server_threads_free(settings, predictor, video):
    """Ten busy sessions, each with a full queue: 40 requests wait, as many as the server's
    default thread pool has threads. Requests served on those threads still answer."""
    s = settings.model_copy(update={"session_lock_timeout_s": 600, "session_queue": 4,
                                    "max_sessions": 10})
    mgr = SAM2Manager(s, predictor=predictor)
    with TestClient(create_app(s, mgr)) as c:
        ids = [upload(c, video).json()["session_id"] for _ in range(10)]
        sessions = [mgr.sessions[sid] for sid in ids]
        arrived = threading.Semaphore(0)
        for session in sessions:
            session.work_lock = AnnouncingLock(arrived)
            session.work_lock.hold()
        results: queue.Queue = queue.Queue()
        threads = [threading.Thread(target=lambda sid=sid: results.put(click(c, sid)))
                   for sid in ids for _ in range(4)]
        try:
            for t in threads:
                t.start()
            for _ in threads:  # every click is waiting for its session, on a thread
                assert arrived.acquire(timeout=120)
            assert results.empty() and sum(s.waiting for s in sessions) == 40
            answered = []
            reader = threading.Thread(target=lambda: answered.append(
                c.get(f"/session/{ids[0]}").status_code))
            reader.start()
            reader.join(timeout=120)
            assert answered == [200], "a read on the default thread pool was starved"
        finally:
            for session in sessions:
                session.work_lock.release()
        assert [results.get(timeout=120).status_code for _ in threads] == [200] * 40


def test_a_job_beyond_a_full_queue_is_refused_at_once(roomy, video):
    sid = upload(roomy, video).json()["session_id"]
    assert click(roomy, sid).status_code == 200
    session = roomy.manager.sessions[sid]
    session.work_lock.acquire()
    try:
        with session.meta_lock:
            session.waiting = roomy.manager.settings.session_queue  # as if that many waited
        r = roomy.post(f"/propagate/{sid}", json={"start_frame": 0, "background": True})
        assert_error(r, 409, "session_busy")
        assert "Retry-After" in r.headers
        assert_error(roomy.post(f"/export/{sid}", json={}), 409, "session_busy")
    finally:
        with session.meta_lock:
            session.waiting = 0
        session.work_lock.release()
    r = roomy.post(f"/propagate/{sid}", json={"start_frame": 0, "background": True})
    assert r.status_code == 202


def test_frame_requests_wait_for_the_decoder_without_holding_threads(roomy, video):
    """Readers of a frame not decoded yet await it: 60 of them hold no thread, so the routes
    that do run on threads (GET /session) still answer."""
    sid = upload(roomy, video).json()["session_id"]
    assert roomy.get(f"/frame/{sid}/7").status_code == 200
    extractor = roomy.manager.sessions[sid].extractor
    with extractor._notify.cond:
        extractor.written = 1  # as if the decoder were still at frame 1
    results: queue.Queue = queue.Queue()
    threads = [threading.Thread(target=lambda: results.put(roomy.get(f"/frame/{sid}/7")))
               for _ in range(CLICKS)]
    for t in threads:
        t.start()
    try:
        for url in ("/health", f"/frame/{sid}/0", f"/session/{sid}", "/sessions"):
            assert roomy.get(url).status_code == 200, url
        assert results.empty()
    finally:
        extractor._publish(8)  # the decoder gets there
    codes = [results.get(timeout=120).status_code for _ in range(CLICKS)]
    assert codes == [200] * CLICKS
