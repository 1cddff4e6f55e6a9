"""Tandem's Grafana dashboard: `dashboards/build.py` generates `dashboards/tandem.json`."""
