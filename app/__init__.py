"""Tradeoff Lab's Streamlit dashboard: pages, pure figure builders and storage glue."""
