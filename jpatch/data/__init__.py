"""Datasets: the JSONL dataset format and its validation (dataset) and the paper's tasks
(tasks: IOI, factual recall, Greater-Than)."""
