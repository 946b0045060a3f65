"""Files in and out: the output folder of a run (PNGs, heatmaps, sorted grid, scores, summary)."""

from bayesdiff_ext.io.outputs import RunRecord, check_output_dir, timestamped_out_dir, versions, write_run

__all__ = ["RunRecord", "check_output_dir", "timestamped_out_dir", "versions", "write_run"]
