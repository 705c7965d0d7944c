"""Tasks rendered offline with PIL and numpy: the reference model's pretraining sources and the miniature suite.

Each image is drawn by a generator seeded by (task, part, index) alone, so an item never depends on which others
were rendered, and a task needs no download. The pretraining sources show each class in a clean domain (printed
glyphs, filled shapes, black-and-white textures, dice); the patch tasks show the same class names in another
domain (dot-matrix and seven-segment displays, house numbers on clutter, outlines on noise, coloured textures,
scattered objects to count, sketches of real Fashion-MNIST images), as PAINT's tasks show CLIP names it knows in
images it rarely saw.
"""
