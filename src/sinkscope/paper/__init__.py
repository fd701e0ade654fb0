"""`sinkscope paper`: the paper's evidence, re-measured, in one report with a verdict per claim.

An application on top of the experiments (nothing below imports it):

- `plan`: the sections (Table 1-3, Fig. 2-5, collapse, over-squashing, massive activations, knock-out,
  streaming), the claim each tests, the experiments it needs and the size of the plan (quick / full);
- `verdicts`: the rule that turns each section's numbers into *reproduced*, *not reproduced* or
  *inconclusive* (the rule's text is shown in the report beside the numbers);
- `runner`: one model load per model, every experiment on the shared protocol in its own directory
  (a finished one whose fingerprint still matches is reused);
- `report`: report.html (self-contained), report.md and findings.md from the saved runs.
"""

from .plan import FULL, QUICK, PlanSize
from .report import build_report
from .runner import run_paper

__all__ = ["FULL", "QUICK", "PlanSize", "build_report", "run_paper"]
