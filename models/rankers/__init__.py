"""rankers"""
