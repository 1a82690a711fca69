"""Training engines. ``engine`` holds the supervised fine-tuning loop shared by every stage."""
