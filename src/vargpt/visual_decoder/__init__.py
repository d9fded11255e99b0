"""visual_decoder"""
