"""Evaluation: how well a learned concept works, the way the Textual Inversion paper measures it.

- `scoring.score_concept`: one concept on any model (the Evaluate tab), by CLIP (`clip.py`) and, on the demo
  model, by a judge (`judging.py`), each beside the same prompts with plain words (`prompts.py`);
- `runner.run_evaluation`: the whole run on the demo world (`studio eval`): compliance, trained concepts (bundled,
  from folders, or held-out individuals, DreamBench-shaped with identity against its ceiling), style transfer,
  composition; `report.py` writes its tables and JSON, `denoising.py` its loss measurements;
- `stats.py`: the 95% intervals every score carries (hierarchical bootstrap over subjects x prompts x pictures).

The judge, its ground truths, the world and its identity scorer are given by the caller (`world.py` says what they
must offer; `studio.demo.evaluate` gives the demo's), so nothing here imports `studio.demo`.
"""
