"""Online personalized scoring with Ray Serve."""
