"""tensorscope-merging: task vectors, TIES conflicts, Fisher-weighted merging, mode connectivity,
loss landscape, sharpness, lottery tickets."""
