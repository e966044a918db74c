"""Collate-side core: where each microbatch's samples start, and which media rows they own."""
