"""Everything a person sees on a terminal: answers, live view, pictures."""
