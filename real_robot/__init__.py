"""Deployment to real arms through ROS (issue: Deploy). Empty until then."""
