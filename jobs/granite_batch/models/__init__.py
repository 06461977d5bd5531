"""The models themselves (torch only: no Arrow, no Ray): engines, profiles, prompts, decoding."""
