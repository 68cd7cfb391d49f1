"""Named index sets of MediaPipe's 478-point face mesh (facts of the public topology).

Each contour is ordered from the outer (lateral) end to the inner end, or left to right across the
mouth, so that upper and lower contours pair up index by index.
"""
from __future__ import annotations

NUM_LANDMARKS = 478

# Inner lip contours between the two mouth corners 78 (image left) and 308 (image right).
INNER_LIP_UPPER = (191, 80, 81, 82, 13, 312, 311, 310, 415)
INNER_LIP_LOWER = (95, 88, 178, 87, 14, 317, 402, 318, 324)
MOUTH_CORNERS_INNER = (78, 308)
OUTER_LIP_UPPER = (185, 40, 39, 37, 0, 267, 269, 270, 409)
OUTER_LIP_LOWER = (146, 91, 181, 84, 17, 314, 405, 321, 375)
MOUTH_CORNERS_OUTER = (61, 291)

# Eyelids, paired from the outer corner to the inner corner. "right" is the subject's right (image left).
RIGHT_EYE_CORNERS = (33, 133)
RIGHT_EYE_UPPER = (246, 161, 160, 159, 158, 157, 173)
RIGHT_EYE_LOWER = (7, 163, 144, 145, 153, 154, 155)
LEFT_EYE_CORNERS = (263, 362)
LEFT_EYE_UPPER = (466, 388, 387, 386, 385, 384, 398)
LEFT_EYE_LOWER = (249, 390, 373, 374, 380, 381, 382)
RIGHT_IRIS = (468, 469, 470, 471, 472)  # centre first
LEFT_IRIS = (473, 474, 475, 476, 477)

RIGHT_EYEBROW = (70, 63, 105, 66, 107, 46, 53, 52, 65, 55)
LEFT_EYEBROW = (300, 293, 334, 296, 336, 276, 283, 282, 295, 285)
NOSE_TIP = 1
NOSE = (1, 2, 4, 5, 6, 19, 45, 48, 64, 94, 97, 98, 115, 168, 195, 197, 220, 275, 278, 294, 326, 327, 344, 440)
CHIN = 152
FOREHEAD_TOP = 10
RIGHT_CHEEK = (50, 101, 36, 205, 187, 123, 116, 117, 118, 119, 100, 147, 213, 192)
LEFT_CHEEK = (280, 330, 266, 425, 411, 352, 345, 346, 347, 348, 329, 376, 433, 416)

# The landmarks a FLAME landmark embedding carries (no face contour, which slides on the surface).
EMBEDDED_LANDMARKS = tuple(sorted(set(
    INNER_LIP_UPPER + INNER_LIP_LOWER + MOUTH_CORNERS_INNER + OUTER_LIP_UPPER + OUTER_LIP_LOWER
    + MOUTH_CORNERS_OUTER + RIGHT_EYE_CORNERS + RIGHT_EYE_UPPER + RIGHT_EYE_LOWER + LEFT_EYE_CORNERS
    + LEFT_EYE_UPPER + LEFT_EYE_LOWER + RIGHT_EYEBROW + LEFT_EYEBROW + NOSE + RIGHT_IRIS[:1] + LEFT_IRIS[:1]
)))

# Landmarks that move little with expression (nose bridge, forehead, eye corners, temples): the
# anchors of the rigid alignment. The jaw and lips are deliberately absent.
RIGID_ANCHORS = (1, 4, 5, 6, 8, 9, 10, 33, 127, 133, 151, 168, 195, 197, 234, 263, 356, 362, 454)
# Landmarks whose motion is expression: lips, eyelids, brows, cheeks, nose wings, chin (no irises:
# gaze is not expression).
EXPRESSIVE = tuple(sorted(set(
    INNER_LIP_UPPER + INNER_LIP_LOWER + OUTER_LIP_UPPER + OUTER_LIP_LOWER + MOUTH_CORNERS_INNER
    + MOUTH_CORNERS_OUTER + RIGHT_EYE_UPPER + RIGHT_EYE_LOWER + LEFT_EYE_UPPER + LEFT_EYE_LOWER
    + RIGHT_EYEBROW + LEFT_EYEBROW + RIGHT_CHEEK + LEFT_CHEEK + (48, 64, 98, 278, 294, 327, 17, 152, 199, 200)
)))
