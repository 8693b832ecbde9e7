"""The only package that talks to MLflow. Library code never imports it."""
