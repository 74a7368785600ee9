"""Small worker and driver programs that supervisor/cli tests run as real processes."""
