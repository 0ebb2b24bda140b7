"""The sweep: one recipe run at several structure levels, then an accuracy-vs-latency front and a choice.

levels.py makes each level's recipe (and the teacher's fp32 export run), front.py scores and times every
level's final artifact beside the teacher's in one interleaved pass, run.py runs it all and writes
output.dir/<name>/ (sweep.json, sweep.md, report.html).
"""
