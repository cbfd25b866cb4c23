"""The comparison behind `jobs/compare.py`: run every setting through the real job and
recommend a budget (`sweep`), render the report (`report`), and match answers (`answers`)."""
