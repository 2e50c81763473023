"""What the head says: metrics, attention quality, faithfulness, overlays, charts, the report page."""
