"""Experiments: sweep grids (:mod:`.grid`), running them (:mod:`.sweep`), loading run folders
(:mod:`.results`), the paper's claims (:mod:`.claims`, science §5), figures and the report."""
