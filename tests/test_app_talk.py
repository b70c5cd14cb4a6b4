"""Talk page: five chapters on the demo data, each a claim, a chart and a takeaway from runs;
previous/next navigation; the chapter in the URL; "run it live" measures here."""
import dataclasses

from app import storage, talk
from engine import devices
from tests.app_fixtures import app_db, click, finished, open_app, shown, task, wait_until  # noqa: F401

PAGE = "views/talk.py"


def test_the_talk_walks_through_all_five_chapters_on_demo_data(app_db):
    storage.load_demo(app_db)
    at = open_app(PAGE)
    titles = []
    for number in range(1, 6):
        assert not at.exception, [e.value for e in at.exception]
        assert at.query_params["chapter"] == str(number)
        titles.append(at.subheader[0].value)
        [chart] = at.get("plotly_chart")
        [takeaway] = at.success
        assert "run it live" not in shown(takeaway.value).lower() or number == 1, shown(takeaway.value)
        if number < 5:
            click(at, "Next →")
    assert titles == [talk.PITFALL_TITLE] + [c.title for c in talk.CHAPTERS]
    click(at, "← Previous")
    assert at.subheader[0].value == talk.CHAPTERS[-2].title


def test_takeaways_come_from_the_runs_shown(app_db):
    storage.load_demo(app_db)
    # Chapter 2's takeaway is computed from the accumulation runs of the demo data.
    runs = talk.chapter_runs(list(talk.CHAPTERS[0].configs), app_db.list(), devices.this_host_id())
    assert [r.config.accum for r in runs] == [8, 4, 2, 1]
    words = talk.accumulation_takeaway(runs)
    assert words.startswith("Effective batch 8 as 1 × 8 used ") and "less memory" in words


def test_without_runs_a_chapter_says_how_to_get_them(app_db):
    at = open_app(PAGE)
    click(at, "Next →")
    assert any("No runs of this chapter yet" in i.value for i in at.info)
    assert not at.get("plotly_chart")


def test_runs_measured_here_take_the_place_of_the_demo_runs(app_db):
    storage.load_demo(app_db)
    demo = talk.chapter_runs(list(talk.CHAPTERS[2].configs), app_db.list(), "elsewhere")
    fp32 = demo[0]
    here = fp32.replace(id="f" * 32, origin="here", created_at="2030-01-01T00:00:00+00:00",
                        env=dataclasses.replace(fp32.env, host_id="this-host"))
    chosen = talk.chapter_runs(list(talk.CHAPTERS[2].configs), [here, *app_db.list()], here.env.host_id)
    assert chosen[0].origin == "here" and all(r.origin == "demo" for r in chosen[1:])


def test_every_takeaway_says_what_it_needs_when_runs_are_missing():
    for chapter in talk.CHAPTERS:
        assert "run it live" in chapter.takeaway([])


def test_run_it_live_times_one_step_both_ways_on_this_machine(app_db):
    at = click(open_app(PAGE), "Run it live on this machine")
    at = wait_until(at, finished("talk.live.1"), timeout=120)
    assert task(at, "talk.live.1").error is None
    assert any(c.value == "Measured live on this machine." for c in at.caption)
    assert "both clocks agree" in shown(at.success[0].value)  # a CPU has no asynchrony
